# LazyConfig twin of musu_R_18_FPN_1800it.yaml (the recommended MuSu for small data, on cards):
# the BCCD recipe with the cards data and its 6 classes.
from ..BCCD.musu_R_18_FPN_1800it import dataloader, lr_multiplier, model, optimizer, train
from ..common.data.small_data import use_dataset

model.num_classes = 6
use_dataset(dataloader, train="cards_train", test="cards_val", min_size=320, max_size=427)
train.output_dir = "./output/cards/musu_R_18_FPN_1800it_lazy"
