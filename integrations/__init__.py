"""Framework adapters (LlamaIndex, LangChain), each following its host ecosystem's conventions."""
