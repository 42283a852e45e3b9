"""``python -m diffllm.export``: the command line lives in ``diffllm.cli.export``."""

from diffllm.cli.export import main

if __name__ == "__main__":
    main()
