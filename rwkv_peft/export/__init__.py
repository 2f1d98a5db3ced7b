"""Models and adapters out to the formats other runtimes read (HF folders, GGUF, peft adapter folders), and in."""
