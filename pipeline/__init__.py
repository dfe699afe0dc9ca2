"""The inference path: sources, preprocessing, the batched speculative-decoding engine, the target model."""
