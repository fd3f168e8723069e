import sys

from tokenmill.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
