"""Server strategies and client-side local training shared by the federated paradigms."""
