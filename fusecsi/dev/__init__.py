"""Demo and dev tooling: `fusecsi dev` (main), the one-machine stack, the walkthrough."""
