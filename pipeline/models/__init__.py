"""Model definitions: the MAE (`mae.py`) and the CLIP loading/registration code (`clip.py`)."""
