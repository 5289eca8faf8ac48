"""Stage 3's machinery: eval data, feature extraction, kNN, logistic regression, linear probe and fine-tune loops, one
topic per module; `stages/evaluate.py` wires them into `salmae eval`. May import `pipeline`'s
root, `data` and `models`; never `stages`.
"""
