"""The `trustrec` console script (cli/main.py) and `trustrec demo` (cli/demo.py): above both wings,
the only package that imports features/, training/, serving/ and bundle/ together."""
