"""Caption rewriting (LaCLIP-style): k faithful rewrites per kept caption, from rules, a chat server or a local
model."""
