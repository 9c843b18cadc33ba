"""The methods that compare themselves with iFAM, on frozen features of a trained or pretrained ViT.

  crops, attention, a2   A²: crops around a small ViT's CLS attention, embedded by a second ViT
  linear                 logistic regression (JAX by default, scikit-learn optionally)
  dfr                    DFR: last-layer retraining on group-balanced held-out data
  dar                    DAR: attention pooling over frozen patch tokens, retrained with the head
"""
