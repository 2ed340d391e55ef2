"""Generic PyTorch infrastructure with the module and function names that EDM network pickles expect."""
