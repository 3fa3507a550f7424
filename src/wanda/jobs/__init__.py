"""Jobs behind the command line: each module holds its settings classes and the function that runs it."""
