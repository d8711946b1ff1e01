"""`genclip`: the one command line for a production line's inspection agent.

`cli.main` is the root (`genclip`, `python -m cli`); each verb is a module-level function in
its own module (`run`, `config`, `score`, `export`, `train`, `synth`, `calibrate`, `evaluate`,
`bench`), with the options they share in `cli.options` and the config file model in
`cli.settings`. The verbs parse options, call the library in agent/, model/, trainer/,
synthetic/ and bench/, and print. cli/ may import every package; none imports cli/.
"""
