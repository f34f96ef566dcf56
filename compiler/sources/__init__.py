"""Where models and texts come from: registered names, Hugging Face folders, GGUF and ONNX files
(:mod:`.models`); the bundled public-domain texts and text files (:mod:`.texts`)."""
