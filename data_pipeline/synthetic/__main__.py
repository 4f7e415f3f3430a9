"""`python -m data_pipeline.synthetic --out DIR --num-volumes N --seed S`."""

from data_pipeline.synthetic.release import main

if __name__ == "__main__":
    main()
