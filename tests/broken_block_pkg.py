"""A user's block module that fails while importing (for the one-line error test)."""

raise RuntimeError('this module is broken on purpose')
