"""Drop-in R-Drop for training libraries; each integration imports its library only when used."""
