"""`python -m fmkt.cli` (what torchrun launches) runs the same app as `fmkt-cli`."""
from fmkt.cli.app import main

main()
