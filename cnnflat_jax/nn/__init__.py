"""Pure ops, layer specs and the Flax models built from them; imports nothing of ours."""
