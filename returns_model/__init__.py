"""The model contract shared by training, serving and the submitter, and shipped inside the .mar.

Modules and what they may import:
  names, fileio, manifest, fetch, standard library only (the submitter's torch-free image uses them);
  results, meta                   results: a photo's answer fields, review reasons, rule names;
                                  meta: model.json (ModelMeta, ArchConfig, PreprocessSpec)
  preprocess, network, artifact   torch and Pillow: the one bytes->tensor path, the network, the
                                  model folder's weights (model.pt), probes and int8 graph
  rule                            torch: the served decision (threshold and gate) and which rule serves
  device                          torch: what --device auto|cpu|cuda gives on this machine
Nothing here imports training/, handler/ or returns_submit/: dependencies point this way only.
"""
