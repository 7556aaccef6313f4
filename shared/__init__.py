"""The ModelWorks model library shared by every service: settings, models, adapters, serving."""
