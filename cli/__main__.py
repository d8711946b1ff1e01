"""`python -m cli`: the same as the `genclip` command."""

from cli.main import main

main()
