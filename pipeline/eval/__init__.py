"""Stage-3 building blocks: eval data, feature extraction, kNN, linear probe and fine-tune loops.

Each module is about one thing; `stages/evaluate.py` wires them into `salmae eval`.
"""
