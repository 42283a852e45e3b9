"""``python -m diffllm.train``: the command line lives in ``diffllm.cli.train``."""

from diffllm.cli.train import main

if __name__ == "__main__":
    main()
