"""One module per pass; :mod:`onnxopt.registry` maps pipeline names to them."""
