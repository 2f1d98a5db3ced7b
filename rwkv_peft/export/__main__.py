"""``python -m rwkv_peft.export``: a model (``--format hf|gguf|pth|safetensors``) or, after the word
``adapter``, an adapter (``--format peft``). Each job lives in its own module."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["adapter"]:
        from rwkv_peft.export.adapter import main as run

        return run(argv[1:])
    from rwkv_peft.export.model import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
