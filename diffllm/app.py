"""``python -m diffllm.app``: the command line lives in ``diffllm.cli.app``."""

from diffllm.cli.app import main

if __name__ == "__main__":
    main()
