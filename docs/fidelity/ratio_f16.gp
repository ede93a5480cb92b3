set xtics ('stories260K' 0, 'slm4096' 5, 'smollm2' 13, 'minilm' 43)
set xtics rotate by -30
set grid xtics
set terminal pngcairo size 1600,600 noenhanced
set output 'docs/fidelity/ratio_f16.png'
set logscale y
set ylabel 'BD product error / dense FP16 rounding error'
set xlabel 'layer sides, model by model (fidelity.md lists them)'
set grid ytics
set key top left
set yrange [0.5:*]
set title 'BD in FP16 on every layer of the real models: first_r vs residual_min vs shared_pivot'
plot 'docs/fidelity/ratio_f16.dat' using 1:2 with points pt 7 ps 0.6 title 'first_r', '' using 1:3 with points pt 5 ps 0.6 title 'residual_min', '' using 1:5 with points pt 9 ps 0.6 title 'shared_pivot, nearest rounding', '' using 1:4 with linespoints pt 13 ps 0.8 title 'shared_pivot (default)', '' using 1:6 with points pt 6 ps 0.6 title 'shared_pivot, one basis for all kv heads', 1.5 with lines dt 2 lc rgb 'black' title '1.5x'
