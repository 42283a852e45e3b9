"""``python -m diffllm.harness``: the command line lives in ``diffllm.cli.harness``."""

from diffllm.cli.harness import main

if __name__ == "__main__":
    main()
