"""edge-llm's exporter (workstation side): a Hugging Face checkpoint folder -> a verified bundle.

Needs the `export` extra (torch, transformers, optimum-onnx). Installed as `edge.export`; of the runtime it
uses the board profiles (`edge.devices`), the KV cache (`edge.cache`, so that its checks run a graph as the
runtime will) and the fidelity figures (`edge.fidelity`, the code `edge eval` runs), and nothing else: the bundle
on disk is the only contract between the two.
"""
