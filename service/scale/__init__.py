"""Scale-out on Ray (the `scale` extra): Serve replicas of the API and job workers as Ray actors. Ray is imported
inside functions only, so nothing here loads unless `el serve --ray` or `el worker --ray` asks for it."""
