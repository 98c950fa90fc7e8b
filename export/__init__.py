"""edge-llm's exporter (workstation side): a Hugging Face checkpoint folder -> a verified bundle.

Needs the `export` extra (torch, transformers, optimum-onnx). Never imports the runtime package `edge`:
the bundle on disk is the only contract between the two.
"""
