"""Training entry point for `deepspeed launch/train.py --stage N`, `torchrun launch/train.py ...` or plain python.

It is the same command as `vlmtrain train`; see `python launch/train.py --help`.
"""

from vlmtrain.cli import train_entry

if __name__ == "__main__":
    train_entry()
