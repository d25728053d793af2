"""`apet`: exactly B parameters, chosen at random among the targeted matrices, train."""
