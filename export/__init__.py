"""edge-llm's exporter (workstation side): a Hugging Face checkpoint folder -> a verified bundle.

Needs the `export` extra (torch, transformers, optimum-onnx). Installed as `edge.export`; of the runtime it
uses the board profiles (`edge.devices`) and nothing else: the bundle on disk is the only contract between the two.
"""
