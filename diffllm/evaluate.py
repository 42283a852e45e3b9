"""``python -m diffllm.evaluate``: the command line lives in ``diffllm.cli.evaluate``."""

from diffllm.cli.evaluate import main

if __name__ == "__main__":
    main()
