"""Files in and out, in two floors (each module's docstring gives its layout):

* file formats, which know arrays and nothing of models: ``safetensors``, ``gguf``, ``gguf_quants``;
* model files, built on :mod:`qlora_np.models`: ``bnb`` (transformers + bitsandbytes folders),
  ``peft`` (PEFT adapters), ``gguf_export`` (llama.cpp adapters and merged models), ``merge``
  (merged weights, one tensor at a time), ``convert`` (streaming quantization of checkpoints).
"""
