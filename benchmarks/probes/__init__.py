"""One-off research probes behind numbers quoted in docs/benchmarks.md ("What else was tried").

Kept runnable so those numbers can be checked; they are not part of the product or of CI.
"""
