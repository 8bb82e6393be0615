"""The generator and its parts: chunk compute, ingest, context resolution, segment assembly, decode."""
