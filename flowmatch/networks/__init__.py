"""Plain nn.Module velocity / noise networks. No Lightning inside.

Every network is called as ``net(z, t, cond=None) -> tensor shaped like z`` where ``t`` is a
float tensor of shape (batch,) in [0, 1] (t = 0 data, t = 1 noise) and ``cond`` is whatever the
data module yields as the condition (None, a label tensor, or a dict of text encodings).
A conditional network drops its condition itself during training (for classifier-free guidance)
and offers ``null_condition(cond)``: the unconditional counterpart of a batch's condition.
"""
