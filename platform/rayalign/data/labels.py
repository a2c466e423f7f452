"""The label value that marks a token no loss is taken on.

It lives in the data layer because tokenization writes it (``chat``, ``packing``); the losses
that skip it read it from here (``rayalign.training.losses`` re-exports it).
"""

# PyTorch's ``cross_entropy`` default ``ignore_index``, so labels go to it unchanged.
IGNORE_INDEX = -100
