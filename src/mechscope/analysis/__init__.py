"""Analysis: metrics of logits, statistics a reviewer asks for, and pictures. Depends on ``core`` only."""
