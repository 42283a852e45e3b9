"""``python -m diffllm.generate``: the command line lives in ``diffllm.cli.generate``."""

from diffllm.cli.generate import main

if __name__ == "__main__":
    main()
