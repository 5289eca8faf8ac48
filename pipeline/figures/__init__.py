"""Pictures: saliency overlays (`overlays`), the stage-2 reconstruction grid (`mae_grid`) and the
report's plots (`plots`). Matplotlib and PIL only here. May import `pipeline`'s root and `data`;
never `stages`.
"""
