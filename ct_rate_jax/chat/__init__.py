"""CT-CHAT: the bridge from CT-ViT tokens to a language model (flax.nnx).

  projector      attention pooling + MLP from the CT-ViT token grid to LLM-width tokens
  lora           LoRA wrappers for nnx linear layers, merging, trainable-parameter filters
  peft_adapter   PEFT adapter files (adapter_config.json, adapter_model.*) -> LoRA weights
  conversation   LLaVA-style conversation records, type tags, chat-template tokenisation
  multimodal     splicing projected visual tokens into the text embeddings
  synthetic_qa   question-answer records generated from a CT-RATE-shaped release
"""
