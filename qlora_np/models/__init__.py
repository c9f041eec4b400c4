"""Language models built from :mod:`qlora_np.nn` layers, and the tokenizer they share."""
