"""The command line: one module per sub-command (its flags and what it prints); `cli.main` dispatches.

Only this layer talks to the terminal: the library below returns values and logs notes through `logging`.
"""
