module cloud.google.com/go
