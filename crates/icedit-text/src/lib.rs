//! Text conditioning for FLUX: CLIP-L pooled output and T5 encoder states.
