"""Built-in demo data: synthetic B-mode liver ultrasound with steatosis grades 0-3."""
