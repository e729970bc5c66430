"""One exception type for every data problem a user can cause (missing files, bad bytes...)."""


class DataError(ValueError):
    """A corpus, split or tokenizer that cannot be loaded as asked; the message says why."""
