"""Input pipelines. A batch is a dict of global arrays sharded over the batch axes:

    images          uint8 [B, H, W, 3]          normalised on device by the train step
    texts           int32 [2B, context_length]  B alt-texts, then B sub-captions
    caption_targets int32 [B, caption_length]   the recaption shifted left by one
    caption_mask    int32 [B, caption_length]   1 where caption_targets is a real token
"""
