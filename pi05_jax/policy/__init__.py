"""The pi0.5 policy layer: raw robot observations in, robot actions out, exactly as openpi's pi0.5 policy.

Input transforms, in upstream's order: adapter inputs (`adapters`), quantile normalization of the state
(`norm_stats`), resize-with-pad to 224x224 and uint8 -> [-1, 1] (`images`), the PaliGemma prompt with the
discretized state (`prompt_tokenizer`), padding of the state to the model's action dim; then the model; then
quantile unnormalization and the adapter's output slice. `pipeline.Policy` chains them.
"""
